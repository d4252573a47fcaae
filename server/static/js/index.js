// The start page: only the language switch.
import { setupLanguage, translatePage } from "./i18n.js";

setupLanguage(document.getElementById("language"), () => translatePage());
translatePage();
